// Host storage for the Function App: Entra-only (no shared keys), TLS 1.2, HTTPS only, no public blobs.
// Holds the deployment package container, the app's and the host's blob containers, and the sync queues.
// With an app subnet, the account refuses every network but that subnet (Microsoft.Storage service
// endpoint) and allowedIpAddresses: the Flex Consumption platform writes and reads the package through
// the app's virtual network integration, so no trusted-service bypass is needed (docs/deploy-network.md).

param name string
param location string
param tags object

@description('Blob container the Flex Consumption plan deploys the app package from.')
param deploymentContainerName string

@description('Sync queue name; its -poison and -deadletter queues derive from it, as in the app.')
param syncQueueName string

@description('Replication; geo-redundant by default so pending sync jobs survive a regional outage.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param skuName string = 'Standard_GRS'

@description('Log Analytics workspace that receives the blob and queue request logs.')
param workspaceId string

@description('Blob containers besides the deployment package\'s, each created here: the app identity gets Storage Blob Data Owner on these and on no other container. Add a container here when code starts using one.')
param appContainerNames array = [
  'azure-webjobs-hosts' // the host: timer singleton and listener leases, host id
  'azure-webjobs-secrets' // the host: function and master keys
  'reconciliation' // reconcile_users: roster in, snapshot and reports out
  'webhook-replay' // the webhook's replay window (shared/replay.py)
  'dataverse-throttle' // the deployment-wide Dataverse throttle (shared/throttle.py)
  'bulk-records' // bulk jobs' claim-check blobs ("recordsBlob": "bulk-records/<path>", docs/bulk.md)
  'config' // the authorization policy blob, AUTHORIZATION_POLICY_BLOB=config/<name>.json (shared/policy.py)
]

@description('Subnet admitted through its Microsoft.Storage service endpoint; the account then denies every other network. Empty: no virtual network, the account accepts every network (still Entra RBAC only).')
param appSubnetId string = ''

@description('Public IPv4 addresses or CIDR ranges let through the storage firewall (an operator running tools/queuectl.py or uploading the roster).')
param allowedIpAddresses array = []

var restricted = !empty(appSubnetId)

var queueNames = [
  syncQueueName
  '${syncQueueName}-poison'
  '${syncQueueName}-deadletter'
]
var requestLogs = [
  {
    category: 'StorageRead'
    enabled: true
  }
  {
    category: 'StorageWrite'
    enabled: true
  }
  {
    category: 'StorageDelete'
    enabled: true
  }
]

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  //checkov:skip=CKV_AZURE_35: defaultAction is Deny whenever the app has a virtual network (the default); only the no-VNet first-trial mode leaves it Allow, still Entra RBAC on every request
  //checkov:skip=CKV_AZURE_59: the public endpoint stays for allowedIpAddresses (operators) behind defaultAction Deny; no anonymous or shared-key access at all
  //checkov:skip=CKV_AZURE_36: bypass None on purpose: no trusted Azure service needs data access (the Flex deployment and the host reach the account through the app subnet)
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'None'
      defaultAction: restricted ? 'Deny' : 'Allow'
      virtualNetworkRules: restricted ? [
        {
          id: appSubnetId
          action: 'Allow'
        }
      ] : []
      // Storage refuses /31 and /32 ranges (the deployment fails): a /32 becomes its single address; a /31
      // must be given as its two addresses.
      ipRules: [for ip in filter(allowedIpAddresses, address => !empty(trim(address))): {
        value: replace(trim(ip), '/32', '')
        action: 'Allow'
      }]
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource appContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for containerName in appContainerNames: {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}]

// The webhook's replay window (webhook-replay, shared/replay.py): one empty blob per accepted signed body,
// <t>/<digest>. A replay blob matters for 300 s (the signature's window); delete it after a day.
resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'expire-webhook-replay'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                'webhook-replay/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: 1
                }
              }
            }
          }
        }
      ]
    }
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for queueName in queueNames: {
  parent: queueService
  name: queueName
}]

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'queue-requests'
  scope: queueService
  properties: {
    workspaceId: workspaceId
    logs: requestLogs
  }
}

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'blob-requests'
  scope: blobService
  properties: {
    workspaceId: workspaceId
    logs: requestLogs
  }
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name
@description('Every blob container the app identity may use: the deployment package container first.')
output blobContainerNames array = concat([deploymentContainer.name], appContainerNames)
output queueNames array = queueNames
