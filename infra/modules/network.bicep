// Outbound virtual network integration for the Flex Consumption app. The app subnet carries
// Microsoft.KeyVault and Microsoft.Storage service endpoints, so a vault and a storage account that deny
// public traffic still admit the app.
// Internet egress (Entra ID, Dataverse) keeps working: the platform sends it from the app's outbound
// addresses, with no NAT gateway needed.

param name string
param location string
param tags object

@description('Address space of the virtual network.')
param addressPrefix string = '10.20.0.0/16'

@description('Subnet for the app (delegated to Microsoft.App/environments, as Flex Consumption requires).')
param appSubnetPrefix string = '10.20.0.0/24'

resource vnet 'Microsoft.Network/virtualNetworks@2024-01-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
          serviceEndpoints: [
            {
              service: 'Microsoft.KeyVault'
            }
            {
              service: 'Microsoft.Storage'
            }
          ]
          privateEndpointNetworkPolicies: 'Disabled'
          privateLinkServiceNetworkPolicies: 'Enabled'
        }
      }
    ]
  }
}

output id string = vnet.id
output appSubnetId string = '${vnet.id}/subnets/app'
