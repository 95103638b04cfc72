// Key Vault for the Dataverse client secret and the webhook signing key. Access is Entra RBAC only;
// soft delete (90 days) and purge protection keep a deleted secret recoverable. Secrets are written
// only when a value is given, and never leave this module: no output or app setting carries them.

param name string
param location string
param tags object

@description('Deny: only the app subnet, Azure trusted services and allowedIpAddresses reach the vault. Allow: open for first-time setup (still Entra RBAC only).')
@allowed([
  'Deny'
  'Allow'
])
param networkDefaultAction string = 'Deny'

@description('Public IPv4 addresses or CIDR ranges (operators, developers) let through when networkDefaultAction is Deny.')
param allowedIpAddresses array = []

@description('Subnet admitted through its Microsoft.KeyVault service endpoint; empty for none.')
param appSubnetId string = ''

@description('Name of the secret that holds the Dataverse client secret (DATAVERSE_CLIENT_SECRET_NAME).')
param clientSecretName string

@description('Name of the secret that holds the webhook signing key (WEBHOOK_SECRET_NAME).')
param webhookSecretName string

@secure()
@description('Dataverse client secret; written only when not empty. Prefer `az keyvault secret set` after deployment.')
param dataverseClientSecret string = ''

@description('DATAVERSE_CREDENTIAL: the client secret exists only in the secret mode (federated and certificate need none).')
@allowed([
  'secret'
  'federated'
  'certificate'
])
param dataverseCredential string = 'secret'

@secure()
@description('Webhook signing key; written only when not empty.')
param webhookSigningSecret string = ''

@description('Name of the secret the app signs queue messages with (MESSAGE_SIGNING_SECRET_NAME).')
param messageSecretName string

@secure()
@description('Queue message signing key; written only when not empty. Only the app (and operators) read it.')
param messageSigningSecret string = ''

@description('Log Analytics workspace that receives the vault audit log.')
param workspaceId string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  //checkov:skip=CKV_AZURE_189: the app reaches the vault over the public endpoint, narrowed by networkAcls (app subnet service endpoint + allowed IPs); private endpoints would add DNS zones the app does not otherwise need
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: networkDefaultAction
      ipRules: [for ip in filter(allowedIpAddresses, address => !empty(trim(address))): {
        value: trim(ip)
      }]
      virtualNetworkRules: empty(appSubnetId) ? [] : [
        {
          id: appSubnetId
          ignoreMissingVnetServiceEndpoint: false
        }
      ]
    }
  }
}

resource clientSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if ((dataverseCredential == 'secret') && !empty(dataverseClientSecret)) {
  parent: vault
  name: clientSecretName
  //checkov:skip=CKV_AZURE_114: contentType is set below; checkov does not read the properties of a conditional (if) resource
  //checkov:skip=CKV_AZURE_41: the secret's lifetime is set where it is issued (the Entra app registration); rotation replaces it and the app re-reads it on invalid_client
  properties: {
    value: dataverseClientSecret
    contentType: 'text/plain'
    attributes: {
      enabled: true
    }
  }
}

resource webhookSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookSigningSecret)) {
  parent: vault
  name: webhookSecretName
  //checkov:skip=CKV_AZURE_114: contentType is set below; checkov does not read the properties of a conditional (if) resource
  //checkov:skip=CKV_AZURE_41: a shared signing key rotated together with its senders; an expiry date here would not revoke it anywhere
  properties: {
    value: webhookSigningSecret
    contentType: 'text/plain'
    attributes: {
      enabled: true
    }
  }
}

resource messageSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(messageSigningSecret)) {
  parent: vault
  name: messageSecretName
  //checkov:skip=CKV_AZURE_114: contentType is set below; checkov does not read the properties of a conditional (if) resource
  //checkov:skip=CKV_AZURE_41: the app's own HMAC key, rotated with a grace period (WEBHOOK_KEY_GRACE_SECONDS); an expiry date would stop every sync job at once
  properties: {
    value: messageSigningSecret
    contentType: 'text/plain'
    attributes: {
      enabled: true
    }
  }
}

resource vaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit'
  scope: vault
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
